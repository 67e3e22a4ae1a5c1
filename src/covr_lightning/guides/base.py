"""The guide interface: a batch of frames (and the policy's observations) in, priors a_v out.

A guide is a recipe component (``guide.class_path`` / ``guide.init_args``). Its recipe arguments
are its constructor's; what comes from the run (the VLM, the prompt, the action bounds, the seed, a
way to load a policy checkpoint) reaches it through :class:`GuideContext` in :meth:`Guide.build`,
which the builder calls. Subclasses implement :meth:`Guide._propose`; :meth:`Guide.propose` checks
shapes, clips to the action bounds and counts invalid answers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GuideContext:
    """What the run offers a guide when the builder makes it.

    Attributes:
        action_low: ``(A,)`` lower action bounds.
        action_high: ``(A,)`` upper action bounds.
        seed: A seed of the guide's own random stream (never the agent's).
        vlm: The run's VLM (:class:`~covr_lightning.vlm.module.VLMLoRAModule`).
        prompt: The task prompt (:class:`~covr_lightning.vlm.prompting.ActionPrompt`).
        codec: The env's action codec (``encode`` / ``decode``).
        max_new_tokens: ``covr.max_new_tokens`` (0: sized from the codec).
        batch_size: ``covr.guide_batch_size``.
        load_policy: Path of a run or checkpoint -> its trained policy (eval mode), for guides
            that act with a policy.
    """

    action_low: np.ndarray
    action_high: np.ndarray
    seed: int
    vlm: Any
    prompt: Any
    codec: Any
    max_new_tokens: int
    batch_size: int
    load_policy: Callable[[str], Any]


class Guide(ABC):
    """Turns the frames of the envs that query now into action priors.

    Attributes:
        queries: Frames answered since the last :meth:`pop_invalid_rate`.
        invalid: Of those, answers that could not be read (masked out of the actor's prior term).
    """

    def __init__(self) -> None:
        self.queries = 0
        self.invalid = 0

    @classmethod
    def build(cls, context: GuideContext, **init_args: Any) -> Guide:
        """Make the guide from its recipe arguments and the run's context (default: ignore it)."""
        return cls(**init_args)

    @abstractmethod
    def _propose(self, frames: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(a_v (B, A), valid (B,))`` for ``frames`` ``(B, H, W, 3)`` / ``obs`` ``(B, ...)``."""

    def propose(
        self, frames: np.ndarray, obs: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Action priors for a batch of query steps.

        Args:
            frames: uint8 RGB ``(B, H, W, 3)`` renders at ``covr.vlm_image_size`` (what a VLM
                sees), or one frame ``(H, W, 3)``.
            obs: The policy's observations of the same steps, ``(B, *obs_shape)`` (what a policy
                guide sees), or one observation; ``None`` for guides that read frames only.

        Returns:
            ``a_v`` float32 ``(B, A)`` and ``valid`` bool ``(B,)``.

        Raises:
            ValueError: Frames that are not uint8 ``(B, H, W, 3)``, or a different count of
                frames and observations.
        """
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames, obs = frames[None], None if obs is None else np.asarray(obs)[None]
        obs = np.zeros((len(frames), 0), np.float32) if obs is None else np.asarray(obs)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 (B, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        if len(obs) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(obs)} observations")
        actions, valid = self._propose(frames, obs)
        actions = np.asarray(actions, dtype=np.float32)
        valid = np.asarray(valid, dtype=bool).reshape(len(frames))
        self.queries += len(valid)
        self.invalid += int((~valid).sum())
        return actions, valid

    def adapter_saved(self, folder: Path, name: str) -> None:
        """The VLM's adapter after a fine-tune was written to ``folder`` (default: nothing to do;
        a guide served from elsewhere loads it there, see :mod:`covr_lightning.guides.served`)."""
        return None

    def close(self) -> None:
        """Release what the guide holds (threads, connections); default: nothing."""
        return None

    def pop_invalid_rate(self) -> float | None:
        """Share of invalid answers since the last call (None without queries); resets counters."""
        rate = self.invalid / self.queries if self.queries else None
        self.queries = self.invalid = 0
        return rate
