"""The env protocol the loop relies on, and the agent-step skeleton every env shares.

An *env step* is one step of the simulator (a dm_control control step, a CarRacing step, a CARLA
tick); an *agent step* (one call of :meth:`PixelEnv.step`) holds one action for
``action_repeat`` env steps, fewer when the episode ends first. Every budget in covr-lightning
counts env steps, so :meth:`PixelEnv.step` always reports the env steps it took in
``info["env_steps"]``.

:class:`PixelEnv` implements :meth:`~PixelEnv.reset` and :meth:`~PixelEnv.step` once: the action
check, the repeat, the reward over the repeat, the episode-length cap, termination versus
truncation, the frame stack and the env-step counts. A subclass fills in the simulator through a
few hooks:

==========================  =============================================================
hook                        what it does
==========================  =============================================================
``_reset_simulation``       start a new episode in the simulator (required)
``_step_simulation``        one env step: ``(reward, terminated, truncated, info)`` (required)
``_frame``                  the current frame, ``frame_shape`` (required)
``render``                  the current view at any size, for the VLM and videos (required)
``_begin_step``             agent action -> simulator command, once per agent step
``_agent_step_reward``      the agent step's reward from its env steps' rewards (default: sum)
==========================  =============================================================

A simulator that loses the episode in progress (a CARLA server that went away and was
reconnected) raises :class:`EpisodeLost` from a hook: the agent step ends as truncated, with the
env steps taken until then and the previous observation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import gymnasium
import numpy as np

from covr_lightning.envs.frames import FrameStack

StepResult = tuple[np.ndarray, float, bool, bool, dict[str, Any]]
"""``(observation, reward, terminated, truncated, info)``, gymnasium's step result."""


class EpisodeLost(Exception):
    """Raised by a :class:`PixelEnv` hook when the simulator lost the episode in progress.

    Args:
        info: The info of the agent step that ends (e.g. ``end_reason``); ``env_steps`` and
            ``episode_return`` are added by :meth:`PixelEnv.step`.
    """

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__("the simulator lost the episode in progress")
        self.info = info


class PixelEnv(gymnasium.Env, ABC):
    """A gymnasium env as the training loop, the builder and ``evaluate`` use it.

    Observations are the last ``frame_stack`` frames stacked on the channel axis (uint8 pixels;
    DMC's ``obs="state"`` mode stacks one float32 vector instead). Actions live in [-1, 1]^A;
    each env maps them onto its simulator's controls. After :meth:`reset` the stack holds
    ``frame_stack`` copies of the first frame, which ``data/replay.py`` relies on when it
    rebuilds stacks by index.

    A subclass calls :meth:`_set_up` in its ``__init__`` and implements the hooks listed in the
    module docstring; it sets (or computes as properties) ``task_description`` and
    ``control_timestep``.

    Attributes:
        action_repeat: Env steps per agent step.
        frame_stack: Frames per observation.
        frame_shape: One frame: ``(C, H, W)`` for pixels (``(D,)`` for a state vector).
        task_description: The task in words, for the VLM's prompt.
        control_timestep: Simulated seconds per env step (videos play in simulated real time).
        max_episode_env_steps: Env steps per episode before truncation (``None``: the
            simulator's own limit, if any).
        observation_space: Box ``(frame_stack * C, H, W)`` uint8 (state: ``(D,)`` float32).
        action_space: Box float32 in [-1, 1]^A.
        env_steps: Env steps taken since construction, over all episodes.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"]}
    render_mode = "rgb_array"

    max_num_envs: ClassVar[int | None] = None
    """Most training envs of this class one run may step together (``run.num_envs``); ``None``
    means no cap. CARLA: 1, as one synchronous world serves one process."""
    episode_metrics: ClassVar[tuple[str, ...]] = ()
    """Info keys read at an episode's last step and reported per episode beside the return
    (``rl/``, ``eval/`` metrics and ``evaluate``), e.g. CARLA's driving distance."""
    codec_kind: ClassVar[str] = "numeric"
    """Action codec family of the VLM (``covr_lightning.vlm.codecs.make_codec``): ``numeric``
    writes one number per action dimension; a subclass may name a phrase codec, per class or per
    instance."""
    default_action_repeat: ClassVar[int] = 1
    """The action repeat when a recipe sets none (see :meth:`resolved_action_repeat`); an env
    whose default depends on the task (DMC's per-domain table) overrides that method instead."""

    action_repeat: int
    frame_stack: int
    frame_shape: tuple[int, ...]
    task_description: str
    control_timestep: float
    max_episode_env_steps: int | None

    @classmethod
    def resolved_action_repeat(cls, init_args: dict[str, Any]) -> int:
        """The action repeat an env built from ``init_args`` will use, without building it.

        Args:
            init_args: The recipe's ``env.init_args`` (constructor arguments).

        Returns:
            ``init_args["action_repeat"]`` when set, else the class's default for the task
            (:attr:`default_action_repeat` unless a subclass knows better, e.g. DMC's per-domain
            table).
        """
        repeat = init_args.get("action_repeat")
        return cls.default_action_repeat if repeat is None else int(repeat)

    def _set_up(
        self,
        *,
        frame_shape: tuple[int, ...],
        frame_stack: int,
        action_repeat: int,
        action_dim: int,
        max_episode_env_steps: int | None,
        frame_dtype: type = np.uint8,
    ) -> None:
        """Set the protocol's attributes, the spaces and the episode counters.

        Args:
            frame_shape: One frame, ``(C, H, W)`` (or ``(D,)``).
            frame_stack: Frames per observation.
            action_repeat: Env steps per agent step.
            action_dim: Number of action dimensions A.
            max_episode_env_steps: Episode-length cap in env steps, or ``None``.
            frame_dtype: ``np.uint8`` for pixels (Box in [0, 255]); a float type for state
                vectors (unbounded Box).
        """
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.frame_stack = int(frame_stack)
        self.action_repeat = int(action_repeat)
        self.max_episode_env_steps = (
            None if max_episode_env_steps is None else int(max_episode_env_steps)
        )
        shape = (self.frame_stack * self.frame_shape[0], *self.frame_shape[1:])
        if np.dtype(frame_dtype) == np.uint8:
            self.observation_space = gymnasium.spaces.Box(0, 255, shape=shape, dtype=np.uint8)
        else:
            self.observation_space = gymnasium.spaces.Box(
                -np.inf, np.inf, shape=shape, dtype=frame_dtype
            )
        self.action_space = gymnasium.spaces.Box(
            -1.0, 1.0, shape=(int(action_dim),), dtype=np.float32
        )
        self.env_steps = 0
        self._frames = FrameStack(self.frame_stack)
        self._episode_env_steps = 0
        self._episode_return = 0.0
        self._needs_reset = True

    # ---------------------------------------------------------------- gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Starts an episode.

        Args:
            seed: If given, reseeds the env's random choices (as if constructed with this seed).
            options: Passed to the simulator where it takes any (CarRacing).

        Returns:
            The first observation (its stack holds copies of the first frame) and an empty dict.
        """
        super().reset(seed=seed)
        self._reset_simulation(seed, options)
        self._episode_env_steps = 0
        self._episode_return = 0.0
        self._frames.reset(self._frame())
        self._needs_reset = False
        return self._frames.observation(), {}

    def step(self, action: np.ndarray) -> StepResult:
        """Holds ``action`` for ``action_repeat`` env steps (fewer if the episode ends).

        Args:
            action: ``(A,)`` action in [-1, 1] (clipped by the env's action mapping).

        Returns:
            ``(obs, reward, terminated, truncated, info)``: the reward over the repeat
            (:meth:`_agent_step_reward`); ``truncated`` at ``max_episode_env_steps`` or the
            simulator's own limit, never together with ``terminated``; info holds the last env
            step's info plus ``env_steps`` (taken in this call) and ``episode_return`` (running
            sum of this episode's rewards).

        Raises:
            RuntimeError: If called before :meth:`reset` or after the episode ended.
            ValueError: If the action's shape is not the action space's.
        """
        if self._needs_reset:
            raise RuntimeError(
                f"{type(self).__name__}.step called before reset() or after the episode ended"
            )
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action shape {action.shape} != {self.action_space.shape}")

        rewards: list[float] = []
        terminated = truncated = False
        info: dict[str, Any] = {}
        try:
            command = self._begin_step(action)
            cap = self.max_episode_env_steps
            for i in range(self.action_repeat):
                capped = cap is not None and self._episode_env_steps + 1 >= cap
                last = capped or i == self.action_repeat - 1
                reward, terminated, truncated, info = self._step_simulation(command, last)
                rewards.append(reward)
                self.env_steps += 1
                self._episode_env_steps += 1
                if terminated or truncated or capped:
                    break
            truncated = (truncated or capped) and not terminated
            self._frames.push(self._frame())
        except EpisodeLost as lost:  # no new frame: the observation stays the last one
            terminated, truncated, info = False, True, lost.info

        reward = self._agent_step_reward(rewards)
        self._episode_return += reward
        self._needs_reset = terminated or truncated
        info = {**info, "env_steps": len(rewards), "episode_return": self._episode_return}
        return self._frames.observation(), reward, terminated, truncated, info

    @abstractmethod
    def render(self, height: int | None = None, width: int | None = None) -> np.ndarray:
        """The current view at any size: the VLM reads it, videos record it.

        Args:
            height: Image height; defaults to the env's own frame or view size.
            width: Image width; defaults likewise.

        Returns:
            ``(height, width, 3)`` uint8 RGB image.
        """

    # ---------------------------------------------------------------- hooks

    @abstractmethod
    def _reset_simulation(self, seed: int | None, options: dict[str, Any] | None) -> None:
        """Start a new episode in the simulator (reseeding its random choices if ``seed``)."""

    @abstractmethod
    def _step_simulation(self, command: Any, last: bool) -> tuple[float, bool, bool, dict]:
        """Advance the simulator by one env step.

        Args:
            command: What :meth:`_begin_step` made of the agent's action.
            last: This is the agent step's last env step unless the simulator ends the episode
                earlier on its own (the repeat or the episode cap ends here); an env may skip
                work whose result only the last env step's frame shows.

        Returns:
            ``(reward, terminated, truncated, info)`` of this env step.

        Raises:
            EpisodeLost: The simulator lost the episode in progress.
        """

    @abstractmethod
    def _frame(self) -> np.ndarray:
        """The current frame, ``frame_shape`` (a fresh array or one nobody writes to again)."""

    def _begin_step(self, action: np.ndarray) -> Any:
        """Map the agent's action (checked shape) onto the simulator's command (default: as is).

        Raises:
            EpisodeLost: The simulator lost the episode in progress.
        """
        return action

    def _agent_step_reward(self, rewards: list[float]) -> float:
        """The agent step's reward from its env steps' rewards, in order (default: the sum)."""
        return float(sum(rewards))
