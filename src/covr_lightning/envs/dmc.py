"""DeepMind Control Suite as a gymnasium env: pixel (or state) observations, fast small-frame rendering.

One *env step* is one dm_control control step; one *agent step* (one call of :meth:`DMCEnv.step`)
repeats the action ``action_repeat`` times. Every budget in covr-lightning counts env steps.

Rendering. dm_control's default offscreen buffer is 640x480 with 4x MSAA and shadows, and
``physics.render`` allocates a fresh scene on every call; on a CPU (Mesa llvmpipe) that caps an
84x84 policy frame at ~30 frames/s. :class:`DMCEnv` therefore, before the lazily created GL
contexts exist, shrinks the offscreen buffer to the frame size, turns MSAA and shadows off, keeps
one persistent camera for the policy frames and renders once per agent step, not per env step.
Frames larger than that buffer (``render(224, 224)`` for the VLM) go to a second, separately sized
GL context built by the same dm_control backend, so they work at any size without slowing the
policy frames (a bigger shared buffer would; a ``mujoco.Renderer`` would bypass dm_control's
bookkeeping of the current GL context). Both paths share the model, so they look alike.
"""

from __future__ import annotations

import logging
import os
import sys

# dm_control picks its GL backend when it is first imported: on a headless Linux machine (no
# DISPLAY) its first choice, GLFW, fails, and EGL works even on Mesa's software rasteriser (OSMesa
# does not). This only helps if dm_control was not imported before this module.
if (
    sys.platform.startswith("linux")
    and not os.environ.get("DISPLAY")
    and "MUJOCO_GL" not in os.environ
):
    os.environ["MUJOCO_GL"] = "egl"
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from jsonargparse.typing import NonNegativeInt, PositiveInt

from covr_lightning.envs.base import PixelEnv
from covr_lightning.errors import ConfigError

if TYPE_CHECKING:
    from dm_control.mujoco import engine

# dm_control and MuJoCo are imported where an env first needs them (about a second): reading a
# recipe, `fit --dry-run` and `recipes` never do.

_HEADLESS = sys.platform.startswith("linux") and not os.environ.get("DISPLAY")

# Action repeat per domain as in PlaNet / CURL / RAD (the paper's DMC protocol).
PAPER_ACTION_REPEAT: dict[str, int] = {
    "cartpole": 8,
    "finger": 2,
    "walker": 2,
    "cheetah": 4,
    "reacher": 4,
    "ball_in_cup": 4,
}

# What each domain's agent should do, in words, for the VLM's prompt (COVR's "task prompt").
TASK_DESCRIPTIONS: dict[str | tuple[str, str], str] = {
    "cartpole": "move the cart so that the pole swings up and stays balanced upright",
    "cheetah": "make the planar cheetah run forward (to the right) as fast as possible",
    "walker": "make the planar walker move forward while staying upright",
    "finger": "use the finger to spin the hinged body as fast as possible",
    "reacher": "move the arm so that its tip reaches the reddish target sphere",
    "ball_in_cup": "swing the ball on its string up and catch it in the cup",
    "hopper": "make the one-legged hopper hop forward while staying upright",
    "pendulum": "swing the pendulum up and keep it balanced upright",
    # A task whose goal differs from its domain's usual one is keyed (domain, task).
    (
        "walker",
        "run",
    ): "make the planar walker run forward as fast as possible while staying upright",
    ("cheetah", "run"): "make the planar cheetah run forward (to the right) as fast as possible",
}

# DrQ / RAD view quadrupeds from camera 2; every other domain from camera 0.
_DEFAULT_CAMERA: dict[str, int] = {"quadruped": 2}


def default_action_repeat(domain: str) -> int:
    """The paper's action repeat for a domain.

    Args:
        domain: dm_control domain name, e.g. ``"cheetah"``.

    Returns:
        The entry of :data:`PAPER_ACTION_REPEAT`, else 2 (the usual choice for harder tasks).
    """
    return PAPER_ACTION_REPEAT.get(domain, 2)


def _check_task(domain: str, task: str) -> None:
    """Raise a one-line ConfigError unless ``domain/task`` is a dm_control suite task."""
    from dm_control import suite

    if (domain, task) in suite.ALL_TASKS:
        return
    tasks: dict[str, list[str]] = {}
    for d, t in suite.ALL_TASKS:
        tasks.setdefault(d, []).append(t)
    if domain not in tasks:
        raise ConfigError(
            f"unknown dm_control domain {domain!r}",
            f"set domain to one of {', '.join(sorted(tasks))} (e.g. domain=cheetah task=run)",
        )
    raise ConfigError(
        f"unknown dm_control task {domain}/{task}",
        f"set task to one of the {domain} tasks: {', '.join(sorted(tasks[domain]))}",
    )


def _check_gl_backend() -> None:
    """Raise a ConfigError instead of an OpenGL crash when dm_control chose GLFW with no display."""
    from dm_control import _render

    if _HEADLESS and _render.BACKEND == "glfw":
        raise ConfigError(
            "dm_control chose the GLFW renderer on a machine without a display (it was imported "
            "before covr_lightning.envs.dmc with MUJOCO_GL unset)",
            "export MUJOCO_GL=egl, or import covr_lightning.envs.dmc before dm_control",
        )


def _rescale_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map an action from [-1, 1] linearly onto [low, high] (out-of-range inputs are clipped).

    a_env = low + (a + 1) / 2 * (high - low)

    Args:
        action: (A,) action in [-1, 1].
        low: (A,) lower bounds of the dm_control action spec.
        high: (A,) upper bounds.

    Returns:
        (A,) float64 action for dm_control.
    """
    a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    return low + (a + 1.0) * 0.5 * (high - low)


def _flatten_state(observation: dict[str, Any]) -> np.ndarray:
    """Concatenate a dm_control observation dict (in spec order) into one float32 vector."""
    return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in observation.values()])


class _LargeFrameRenderer:
    """Renders one camera at a fixed size in its own GL context and offscreen buffer.

    Used for frames larger than the policy buffer. The MjrContext sizes its offscreen buffer from
    ``model.vis.global_`` when it is created, so that is enlarged for the creation only and put back:
    the policy context (created before or after) and dm_control's size checks keep the small buffer.

    Args:
        physics: The env's dm_control physics (model and data are shared, not copied).
        height: Frame height in pixels.
        width: Frame width in pixels.
        camera_id: Fixed camera index.
    """

    def __init__(self, physics: engine.Physics, height: int, width: int, camera_id: int) -> None:
        import mujoco
        from dm_control import _render
        from dm_control.mujoco import wrapper

        self.size = (height, width)
        model = physics.model
        self._gl = _render.Renderer(max_width=width, max_height=height)
        saved = (model.vis.global_.offwidth, model.vis.global_.offheight)
        model.vis.global_.offwidth, model.vis.global_.offheight = width, height
        try:
            self._mjr = wrapper.MjrContext(model, self._gl)
        finally:
            model.vis.global_.offwidth, model.vis.global_.offheight = saved
        self._scene = mujoco.MjvScene(model.ptr, maxgeom=10_000)
        self._option = mujoco.MjvOption()
        self._perturb = mujoco.MjvPerturb()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = camera_id
        self._rect = mujoco.MjrRect(0, 0, width, height)
        self._rgb = np.empty((height, width, 3), dtype=np.uint8)

    def render(self, physics: engine.Physics) -> np.ndarray:
        """Returns the current view as a (H, W, 3) uint8 array."""
        import mujoco

        mujoco.mjv_updateScene(
            physics.model.ptr,
            physics.data.ptr,
            self._option,
            self._perturb,
            self._camera,
            mujoco.mjtCatBit.mjCAT_ALL,
            self._scene,
        )
        with self._gl.make_current() as ctx:
            ctx.call(self._draw)
        return self._gl.to_pixels(self._rgb).copy()  # GL rows start at the bottom: flip

    def _draw(self) -> None:
        import mujoco

        mujoco.mjr_render(self._rect, self._scene, self._mjr.ptr)
        mujoco.mjr_readPixels(self._rgb, None, self._rect, self._mjr.ptr)

    def close(self) -> None:
        """Frees the GL context and its buffers."""
        self._mjr.free()
        self._gl.free()


def _quiet_load(domain: str, task: str, seed: int):
    """``suite.load`` without MuJoCo's compile-time deprecation notices.

    cheetah's XML uses ``settotalmass``, which makes MuJoCo >= 3.3 warn through absl on every
    load: dozens of identical lines per run (train env, eval env, benchmarks) that a user can do
    nothing about.
    """
    from dm_control import suite

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return suite.load(domain, task, task_kwargs={"random": seed})
    finally:
        absl_logger.setLevel(level)


DEFAULT_DOMAIN = "cheetah"
"""The constructor's default domain (and so the default action repeat's)."""


class DMCEnv(PixelEnv):
    """A dm_control suite task behind the gymnasium API, with frame stacking and action repeat.

    Args:
        domain: dm_control domain, e.g. ``"cheetah"``.
        task: Task of that domain, e.g. ``"run"``.
        obs: ``"pixels"`` (stacked uint8 camera frames) or ``"state"`` (the flat proprioceptive
            vector, never stacked).
        image_size: Side of the square pixel frames.
        frame_stack: Frames per pixel observation (3 in the recipe); forced to 1 for ``"state"``.
        action_repeat: Env steps per agent step; ``None`` takes :func:`default_action_repeat`.
        camera_id: Fixed camera; ``None`` takes 0 (2 for quadruped, as in DrQ / RAD).
        max_episode_env_steps: Optional cap on env steps per episode (truncation), below the
            task's own time limit (1000 env steps for most tasks).
        seed: Seed of the task's random state (initial states); ``reset(seed=...)`` reseeds.

    Attributes:
        observation_space: pixels: Box uint8 (frame_stack*3, image_size, image_size);
            state: Box float32 (state_dim,).
        action_space: Box float32 [-1, 1]^A, rescaled linearly to the dm_control bounds in
            :meth:`step`.
        frame_shape: One frame: (3, H, W) for pixels, (state_dim,) for state.

    Raises:
        ConfigError: Unknown domain/task, a camera the model does not have, or dm_control's GL
            backend unusable on this machine. Sizes, repeats and caps are typed (positive
            integers), which a recipe is checked against when it is parsed.
    """

    def __init__(
        self,
        domain: str = DEFAULT_DOMAIN,
        task: str = "run",
        obs: Literal["pixels", "state"] = "pixels",
        image_size: PositiveInt = 84,
        frame_stack: PositiveInt = 3,
        action_repeat: PositiveInt | None = None,
        camera_id: NonNegativeInt | None = None,
        max_episode_env_steps: PositiveInt | None = None,
        seed: int = 0,
    ) -> None:
        _check_task(domain, task)
        if obs == "pixels":
            _check_gl_backend()
        self.domain, self.task, self.obs_mode = domain, task, obs
        self.image_size = int(image_size)
        self.camera_id = _DEFAULT_CAMERA.get(domain, 0) if camera_id is None else int(camera_id)

        self._env = _quiet_load(domain, task, seed)
        physics = self._env.physics
        if not 0 <= self.camera_id < physics.model.ncam:
            self._env.close()
            raise ConfigError(
                f"camera_id={self.camera_id} does not exist in {domain} "
                f"({physics.model.ncam} cameras)",
                f"set camera_id between 0 and {physics.model.ncam - 1}",
            )
        # Must happen before the first render: dm_control creates its GL contexts lazily and
        # sizes the offscreen buffer (and its MSAA samples) from these fields at that moment.
        physics.model.vis.global_.offwidth = self.image_size
        physics.model.vis.global_.offheight = self.image_size
        physics.model.vis.quality.offsamples = 0
        physics.model.light_castshadow[:] = 0
        self._camera: engine.Camera | None = None  # policy camera, created on first render
        self._large: _LargeFrameRenderer | None = None
        self._time_step = None  # the newest dm_control TimeStep

        spec = self._env.action_spec()
        self._action_low = np.asarray(spec.minimum, dtype=np.float64) * np.ones(spec.shape)
        self._action_high = np.asarray(spec.maximum, dtype=np.float64) * np.ones(spec.shape)
        if obs == "pixels":
            frame_shape: tuple[int, ...] = (3, self.image_size, self.image_size)
        else:
            frame_shape = (
                sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values()),
            )
        self._set_up(
            frame_shape=frame_shape,
            frame_stack=frame_stack if obs == "pixels" else 1,
            action_repeat=self.resolved_action_repeat(
                {"domain": domain, "action_repeat": action_repeat}
            ),
            action_dim=int(np.prod(spec.shape)),
            max_episode_env_steps=max_episode_env_steps,
            frame_dtype=np.uint8 if obs == "pixels" else np.float32,
        )

    @classmethod
    def resolved_action_repeat(cls, init_args: dict[str, Any]) -> int:
        """The recipe's ``action_repeat``, else :func:`default_action_repeat` of its domain."""
        repeat = init_args.get("action_repeat")
        domain = init_args.get("domain", DEFAULT_DOMAIN)
        return default_action_repeat(domain) if repeat is None else int(repeat)

    # ---------------------------------------------------------------- PixelEnv hooks

    def _reset_simulation(self, seed: int | None, options: dict[str, Any] | None) -> None:
        if seed is not None:
            self._env.task.random.seed(seed)
        self._time_step = self._env.reset()

    def _begin_step(self, action: np.ndarray) -> np.ndarray:
        return _rescale_action(action, self._action_low, self._action_high)

    def _step_simulation(self, command: np.ndarray, last: bool) -> tuple[float, bool, bool, dict]:
        """One control step; the episode ends with discount 0 (terminated) or its time limit."""
        self._time_step = time_step = self._env.step(command)
        discount = float(time_step.discount) if time_step.discount is not None else 1.0
        terminated = time_step.last() and discount == 0.0
        truncated = time_step.last() and not terminated
        return float(time_step.reward or 0.0), terminated, truncated, {"discount": discount}

    def _frame(self) -> np.ndarray:
        """One frame: (3, S, S) uint8 for pixels, (state_dim,) float32 for state."""
        if self.obs_mode == "state":
            return _flatten_state(self._time_step.observation)
        return np.ascontiguousarray(self._policy_view().transpose(2, 0, 1))

    # ---------------------------------------------------------------- rendering

    def render(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Renders the current state from the env's camera at any size.

        Args:
            height: Image height; defaults to ``image_size``.
            width: Image width; defaults to ``image_size``.

        Returns:
            (height, width, 3) uint8 RGB image.
        """
        _check_gl_backend()
        height = self.image_size if height is None else int(height)
        width = self.image_size if width is None else int(width)
        physics = self._env.physics
        if (height, width) == (self.image_size, self.image_size):
            return self._policy_view().copy()
        if height <= self.image_size and width <= self.image_size:
            return physics.render(height, width, camera_id=self.camera_id)
        if self._large is None or self._large.size != (height, width):
            if self._large is not None:
                self._large.close()
            self._large = _LargeFrameRenderer(physics, height, width, self.camera_id)
        return self._large.render(physics)

    @property
    def control_timestep(self) -> float:
        """Simulated seconds per env step (dm_control's control timestep)."""
        return float(self._env.control_timestep())

    @property
    def task_description(self) -> str:
        """The task in words, for the VLM's prompt."""
        default = f"solve the {self.domain} {self.task} task"
        return TASK_DESCRIPTIONS.get(
            (self.domain, self.task), TASK_DESCRIPTIONS.get(self.domain, default)
        )

    def close(self) -> None:
        """Frees the GL contexts and the dm_control environment (idempotent)."""
        if self._large is not None:
            self._large.close()
            self._large = None
        if self._camera is not None:
            self._camera.scene.free()
            self._camera = None
        if self._env is not None:
            self._env.close()
            self._env = None

    # ---------------------------------------------------------------- helpers

    def _policy_view(self) -> np.ndarray:
        """(S, S, 3) uint8 view of the persistent camera's reused buffer (copy before keeping).

        One camera for all policy frames: ``physics.render`` would allocate a scene per frame,
        which costs about as much as the drawing itself at 84x84.
        """
        if self._camera is None:
            from dm_control.mujoco import engine

            self._camera = engine.Camera(
                self._env.physics, self.image_size, self.image_size, self.camera_id
            )
        return self._camera.render()
