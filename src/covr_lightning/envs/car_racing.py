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
from jsonargparse.typing import PositiveInt
from PIL import Image

from covr_lightning.envs.base import PixelEnv
from covr_lightning.errors import ConfigError
from covr_lightning.types import OpenClosedUnitInterval

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


class CarRacingEnv(PixelEnv):
    """gymnasium CarRacing-v3 (continuous) from pixels, with frame stacking and action repeat.

    Args:
        image_size: Side of the square policy frames (CarRacing's own are 96).
        frame_stack: Frames per observation, stacked on the channel axis.
        action_repeat: Env steps per agent step; ``None`` takes :data:`DEFAULT_ACTION_REPEAT` (4).
        crop_hud: Cut the dashboard strip (and 6 columns per side) from the 96x96 frame before
            resizing: the square 84x84 top-centre. Also applies to :meth:`render`.
        max_episode_env_steps: Env steps per episode before truncation; ``None`` keeps
            CarRacing-v3's registered 1000.
        lap_complete_percent: Share of the track's tiles that completes a lap, in (0, 1]
            (CarRacing's 0.95).
        domain_randomize: Random road, grass and background colours per episode (CarRacing's
            option; off in the standard task).
        seed: Seed of the first episode's track; later resets without a seed continue from it.
            ``reset(seed=...)`` reseeds.

    Attributes:
        observation_space: Box uint8 (3 * frame_stack, image_size, image_size).
        action_space: Box float32 [-1, 1]^3 = (steer, gas, brake), mapped by
            :func:`to_car_racing_action`.
        frame_shape: One frame, (3, image_size, image_size).

    Raises:
        ConfigError: Box2D or pygame missing. Sizes, repeats, caps and ``lap_complete_percent``
            are typed, which a recipe is checked against when it is parsed.
    """

    codec_kind = "car_racing"
    """Action codec family of the VLM (``covr_lightning.vlm.codecs.make_codec``): phrases for
    steer, gas and brake."""
    default_action_repeat = DEFAULT_ACTION_REPEAT
    control_timestep = 1.0 / 50.0
    """Simulated seconds per env step (CarRacing runs at 50 steps per second)."""
    task_description = TASK_DESCRIPTION

    def __init__(
        self,
        image_size: PositiveInt = 84,
        frame_stack: PositiveInt = 3,
        action_repeat: PositiveInt | None = None,
        crop_hud: bool = False,
        max_episode_env_steps: PositiveInt | None = None,
        lap_complete_percent: OpenClosedUnitInterval = 0.95,
        domain_randomize: bool = False,
        seed: int = 0,
    ) -> None:
        _require_box2d()
        self.image_size = int(image_size)
        self.crop_hud = bool(crop_hud)
        self._seed: int | None = int(seed)  # used by the first reset without a seed

        # The episode cap is CarRacing's own time limit (gymnasium's TimeLimit wrapper); the
        # skeleton's cap is the same number, so both end an episode on the same env step.
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
        self._native: np.ndarray | None = None  # CarRacing's newest 96x96 observation
        self._set_up(
            frame_shape=(3, self.image_size, self.image_size),
            frame_stack=frame_stack,
            action_repeat=self.resolved_action_repeat({"action_repeat": action_repeat}),
            action_dim=3,
            max_episode_env_steps=max_episode_env_steps,
        )

    # ---------------------------------------------------------------- PixelEnv hooks

    def _reset_simulation(self, seed: int | None, options: dict[str, Any] | None) -> None:
        """A new random track: ``seed`` reseeds CarRacing's generator (track shape, colours
        under ``domain_randomize``); else the first reset uses the constructor's seed and later
        ones continue its stream. ``options`` go to CarRacing (``{"randomize": False}`` keeps
        the colours)."""
        if seed is None:
            seed, self._seed = self._seed, None
        else:
            self._seed = None
        self._native, _ = self._env.reset(seed=seed, options=options)

    def _begin_step(self, action: np.ndarray) -> np.ndarray:
        return to_car_racing_action(action)

    def _step_simulation(self, command: np.ndarray, last: bool) -> tuple[float, bool, bool, dict]:
        """One CarRacing step: +1000/N per new track tile, -0.1 per step, -100 for leaving the
        playfield; terminated when the lap is complete or the car left the playfield, truncated
        at the step limit. Info has CarRacing's ``lap_finished`` when it terminated."""
        if not last:  # a frame nobody will see: skip the drawing
            self._car_racing._render = _no_frame
        try:
            self._native, reward, terminated, truncated, info = self._env.step(command)
        finally:
            self._car_racing.__dict__.pop("_render", None)
        out = {"lap_finished": bool(info["lap_finished"])} if "lap_finished" in info else {}
        return float(reward), terminated, truncated, out

    def _frame(self) -> np.ndarray:
        """(96, 96, 3) CarRacing observation -> (3, S, S) uint8 policy frame."""
        if self._native is None:  # the episode ended on a step that skipped its drawing
            self._native = self._car_racing.state = self._car_racing._render("state_pixels")
        image = np.asarray(self._native, dtype=np.uint8)
        if self.crop_hud:
            top, bottom, left, right = _HUD_CROP
            image = image[top:bottom, left:right]
        image = _resize(image, self.image_size, self.image_size)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    # ---------------------------------------------------------------- rendering

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

    def close(self) -> None:
        """Closes CarRacing (idempotent)."""
        if self._env is not None:
            self._env.close()
            self._env = None
