"""gymnasium's CarRacing-v3 from pixels, with frame stacking, action repeat and a semantic codec.

One *env step* is one CarRacing step (1/50 s of simulated time); one *agent step* (one call of
:meth:`CarRacingEnv.step`) repeats the action ``action_repeat`` times. Every budget in
covr-lightning counts env steps. CarRacing's own time limit is 1000 env steps.

Actions. The agent acts in [-1, 1]^3 = (steer, gas, brake), the layout of the ``car_racing``
phrase codec (``covr_lightning.vlm.codecs``), and :func:`to_car_racing_action` maps it linearly onto
CarRacing's bounds: steer stays in [-1, 1] (negative turns left), gas and brake go from [-1, 1] to
[0, 1] (-1 = released, 1 = fully pressed). The codec's canonical levels are those agent values, so
``"half gas"`` (0) is gas 0.5 and ``"hard brake"`` (0.6) is brake 0.8, the keyboard's brake.

Frames. CarRacing draws each step on a 1000x800 pygame surface (top-down, turning with the car,
which sits three quarters down the image facing up) and downsamples it to its 96x96 observation.
A policy frame is that observation, optionally without the dashboard strip (``crop_hud``: the
bottom eighth, where speed, wheel spin, steering and the score are drawn, is cut together with 6
columns on each side, leaving the square 84x84 top-centre), resized to ``image_size`` with an area
filter. :meth:`CarRacingEnv.render` downsamples the same surface, cropped alike, to any size, so
the VLM reads a sharper copy of the newest frame the policy sees. The first 50 env steps of an
episode zoom in from far above (CarRacing's own intro).

Speed. Drawing and downsampling the surface costs ~16 ms of the ~16.3 ms of an env step on a CPU,
and under action repeat only the last frame is seen, so the other steps of a repeat skip the
drawing (CarRacing's ``_render`` is shadowed on the instance for those steps). Drawing has no
effect on the physics or the rewards; tests compare against an untouched CarRacing-v3.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

# pygame (imported by CarRacing) needs no display for drawing on surfaces, but SDL would try one if
# anything opened a window; the dummy driver keeps headless machines headless. Only if unset.
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # no banner on every import

from typing import Any

import gymnasium
import numpy as np
from PIL import Image

from covr_lightning.envs.frames import FrameStack
from covr_lightning.errors import ConfigError, require_positive_ints

DEFAULT_ACTION_REPEAT = 4
"""Env steps per agent step: 12.5 decisions per simulated second, 250 per 1000-step episode."""

TASK_DESCRIPTION = (
    "drive the red race car, seen from above and facing up the image, along the grey road as "
    "fast as possible without leaving it, covering as much of the closed track as you can"
)

NATIVE_SIZE = 96
"""Side of CarRacing's own observation (gymnasium's ``STATE_W``/``STATE_H``)."""
_HUD_CROP = (0, 84, 6, 90)
"""(top, bottom, left, right) of the frame without the dashboard, in the 96x96 observation: the
bar covers the bottom 12 rows (gymnasium's ``_render_indicators``: H/8)."""


def default_action_repeat(domain: str | None = None) -> int:
    """CarRacing's action repeat.

    Args:
        domain: Ignored (CarRacing has one task); present so callers can treat every env class
            alike.

    Returns:
        :data:`DEFAULT_ACTION_REPEAT` (4).
    """
    return DEFAULT_ACTION_REPEAT


def to_car_racing_action(action: np.ndarray) -> np.ndarray:
    """Map an agent action in [-1, 1]^3 onto CarRacing's (steer, gas, brake).

    steer = a_0;  gas = (a_1 + 1) / 2;  brake = (a_2 + 1) / 2  (inputs clipped to [-1, 1] first).

    Args:
        action: (3,) agent action (steer, gas, brake) in [-1, 1].

    Returns:
        (3,) float64 action with steer in [-1, 1] (negative: left), gas and brake in [0, 1].
    """
    a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    return np.array([a[0], (a[1] + 1.0) * 0.5, (a[2] + 1.0) * 0.5])


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (height, width, 3) uint8 with an area (box) filter; a no-op at size."""
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BOX)
    return np.asarray(resized)


def _require_box2d() -> None:
    """Raise a one-line ConfigError unless Box2D and pygame (CarRacing's dependencies) import."""
    missing = []
    for module in ("Box2D", "pygame"):
        try:
            with warnings.catch_warnings():  # Box2D's SWIG types warn on import
                warnings.filterwarnings("ignore", "builtin type", DeprecationWarning)
                importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(
            f"CarRacing needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
            " not installed",
            'pip install "covr-lightning[box2d]"',
        )


def _no_frame(mode: str) -> None:
    """Stands in for CarRacing's ``_render`` on the env steps of a repeat whose frame nobody sees."""
    return None


class CarRacingEnv(gymnasium.Env):
    """gymnasium CarRacing-v3 (continuous) from pixels, with frame stacking and action repeat.

    Args:
        image_size: Side of the square policy frames (CarRacing's own are 96).
        frame_stack: Frames per observation, stacked on the channel axis.
        action_repeat: Env steps per agent step; ``None`` takes :func:`default_action_repeat` (4).
        crop_hud: Cut the dashboard strip (and 6 columns per side) from the 96x96 frame before
            resizing: the square 84x84 top-centre. Also applies to :meth:`render`.
        max_episode_env_steps: Env steps per episode before truncation; ``None`` keeps
            CarRacing-v3's registered 1000.
        lap_complete_percent: Share of the track's tiles that completes a lap (CarRacing's 0.95).
        domain_randomize: Random road, grass and background colours per episode (CarRacing's
            option; off in the standard task).
        seed: Seed of the first episode's track; later resets without a seed continue from it.
            ``reset(seed=...)`` reseeds.

    Attributes:
        observation_space: Box uint8 (3 * frame_stack, image_size, image_size).
        action_space: Box float32 [-1, 1]^3 = (steer, gas, brake), mapped by
            :func:`to_car_racing_action`.
        frame_shape: One frame, (3, image_size, image_size).
        frame_stack: Frames per observation.
        action_repeat: Env steps per agent step.
        env_steps: Env steps taken since construction (a repeat cut short by the episode's end
            counts only the steps taken).

    Raises:
        ConfigError: Box2D or pygame missing, a non-positive size, stack, repeat or step cap, or
            ``lap_complete_percent`` outside (0, 1].
    """

    metadata = {"render_modes": ["rgb_array"]}
    codec_kind = "car_racing"
    """Action codec family of the VLM (``covr_lightning.vlm.codecs.make_codec``): phrases for
    steer, gas and brake."""
    # Lets the training plan resolve the default without building an env.
    default_action_repeat = staticmethod(default_action_repeat)

    def __init__(
        self,
        image_size: int = 84,
        frame_stack: int = 3,
        action_repeat: int | None = None,
        crop_hud: bool = False,
        max_episode_env_steps: int | None = None,
        lap_complete_percent: float = 0.95,
        domain_randomize: bool = False,
        seed: int = 0,
    ) -> None:
        action_repeat = default_action_repeat() if action_repeat is None else action_repeat
        require_positive_ints(
            {
                "image_size": image_size,
                "frame_stack": frame_stack,
                "action_repeat": action_repeat,
                "max_episode_env_steps": max_episode_env_steps,
            },
            prefix="env.",
        )
        if not 0.0 < lap_complete_percent <= 1.0:
            raise ConfigError(
                f"lap_complete_percent={lap_complete_percent} is outside (0, 1]",
                "set lap_complete_percent to a share of the track, e.g. 0.95",
            )
        _require_box2d()

        self.image_size = int(image_size)
        self.frame_stack = int(frame_stack)
        self.action_repeat = int(action_repeat)
        self.crop_hud = bool(crop_hud)
        self.max_episode_env_steps = max_episode_env_steps
        self.render_mode = "rgb_array"
        self.env_steps = 0
        self._seed: int | None = int(seed)  # used by the first reset without a seed

        self._env = gymnasium.make(
            "CarRacing-v3",
            render_mode="rgb_array",
            continuous=True,
            lap_complete_percent=lap_complete_percent,
            domain_randomize=domain_randomize,
            max_episode_steps=max_episode_env_steps,  # None: the registered 1000
            # Skipped draws return no observation mid-repeat, which the checker would flag.
            disable_env_checker=True,
        )
        self._car_racing = self._env.unwrapped

        self.frame_shape: tuple[int, ...] = (3, self.image_size, self.image_size)
        self.observation_space = gymnasium.spaces.Box(
            0, 255, shape=(3 * self.frame_stack, self.image_size, self.image_size), dtype=np.uint8
        )
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)

        self._frames = FrameStack(self.frame_stack)
        self._episode_return = 0.0
        self._needs_reset = True

    # ---------------------------------------------------------------- gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Starts an episode on a new random track.

        Args:
            seed: If given, reseeds CarRacing's random generator (track shape, colours under
                ``domain_randomize``); else the first reset uses the constructor's seed and later
                ones continue its stream.
            options: Passed to CarRacing (``{"randomize": False}`` keeps the colours).

        Returns:
            The first observation (its stack holds copies of the first frame) and an empty dict.
        """
        super().reset(seed=seed)
        if seed is None:
            seed, self._seed = self._seed, None
        else:
            self._seed = None
        native, _ = self._env.reset(seed=seed, options=options)
        self._episode_return = 0.0
        self._needs_reset = False
        self._frames.reset(self._frame(native))
        return self._frames.observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Repeats ``action`` for ``action_repeat`` env steps (fewer if the episode ends).

        Args:
            action: (3,) agent action (steer, gas, brake) in [-1, 1]; clipped, then mapped by
                :func:`to_car_racing_action`.

        Returns:
            ``(obs, reward, terminated, truncated, info)``: reward summed over the repeat
            (+1000/N per new track tile, -0.1 per env step, -100 for leaving the playfield);
            ``terminated`` when the lap is complete or the car left the playfield; ``truncated``
            at the step limit; info has ``env_steps`` (taken in this call) and ``episode_return``
            (running sum), plus CarRacing's ``lap_finished`` when it terminated.

        Raises:
            RuntimeError: If called before :meth:`reset` or after the episode ended.
            ValueError: If the action's shape is not (3,).
        """
        if self._needs_reset:
            raise RuntimeError("CarRacingEnv.step called before reset() or after the episode ended")
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action shape {action.shape} != {self.action_space.shape}")
        env_action = to_car_racing_action(action)

        reward, steps = 0.0, 0
        terminated = truncated = False
        native, info = None, {}
        for i in range(self.action_repeat):
            if i < self.action_repeat - 1:  # a frame nobody will see: skip the drawing
                self._car_racing._render = _no_frame
            try:
                native, step_reward, terminated, truncated, info = self._env.step(env_action)
            finally:
                self._car_racing.__dict__.pop("_render", None)
            steps += 1
            reward += float(step_reward)
            if terminated or truncated:
                break
        if native is None:  # the episode ended on a step that skipped its drawing
            native = self._car_racing.state = self._car_racing._render("state_pixels")

        self.env_steps += steps
        self._episode_return += reward
        truncated = truncated and not terminated
        self._needs_reset = terminated or truncated
        self._frames.push(self._frame(native))
        out = {"env_steps": steps, "episode_return": self._episode_return}
        if "lap_finished" in info:
            out["lap_finished"] = bool(info["lap_finished"])
        return self._frames.observation(), reward, terminated, truncated, out

    def render(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """The current view at any size (the VLM reads a larger one than the policy).

        At ``image_size`` this is the newest policy frame; at other sizes CarRacing's 1000x800
        surface of the same step is downsampled directly (cropped as the frames are), so the
        picture matches the policy's, only sharper.

        Args:
            height: Image height; defaults to ``image_size``.
            width: Image width; defaults to ``image_size``.

        Returns:
            (height, width, 3) uint8 RGB image.

        Raises:
            RuntimeError: If called before the first :meth:`reset`.
        """
        height = self.image_size if height is None else int(height)
        width = self.image_size if width is None else int(width)
        surface = getattr(self._car_racing, "surf", None)
        if self._frames.newest is None or surface is None:
            raise RuntimeError("CarRacingEnv.render called before reset()")
        if (height, width) == (self.image_size, self.image_size):
            return self._frames.newest.transpose(1, 2, 0).copy()
        import pygame

        if self.crop_hud:  # the frames' crop, scaled from 96x96 to the surface
            top, bottom, left, right = _HUD_CROP
            sx, sy = surface.get_width() / NATIVE_SIZE, surface.get_height() / NATIVE_SIZE
            x, y = round(left * sx), round(top * sy)
            surface = surface.subsurface(x, y, round(right * sx) - x, round(bottom * sy) - y)
        scaled = pygame.transform.smoothscale(surface, (width, height))
        return np.ascontiguousarray(pygame.surfarray.array3d(scaled).transpose(1, 0, 2))

    @property
    def control_timestep(self) -> float:
        """Simulated seconds per env step (CarRacing runs at 50 steps per second)."""
        return 1.0 / 50.0

    @property
    def task_description(self) -> str:
        """The task in words, for the VLM's prompt."""
        return TASK_DESCRIPTION

    def close(self) -> None:
        """Closes CarRacing (idempotent)."""
        if self._env is not None:
            self._env.close()
            self._env = None

    # ---------------------------------------------------------------- helpers

    def _frame(self, native: np.ndarray) -> np.ndarray:
        """(96, 96, 3) CarRacing observation -> (3, S, S) uint8 policy frame."""
        image = np.asarray(native, dtype=np.uint8)
        if self.crop_hud:
            top, bottom, left, right = _HUD_CROP
            image = image[top:bottom, left:right]
        image = _resize(image, self.image_size, self.image_size)
        return np.ascontiguousarray(image.transpose(2, 0, 1))
