"""Uniform random actions as the prior: the worst informative-looking guide (a mechanism test)."""

from __future__ import annotations

import numpy as np

from covr_lightning.guides.base import Guide, GuideContext


class UniformGuide(Guide):
    """a_v ~ U[low, high] per action dimension, always valid; its own seeded generator.

    Args:
        action_low: ``(A,)`` lower bounds.
        action_high: ``(A,)`` upper bounds.
        seed: Seed of the draws (the builder derives it from ``run.seed``, apart from the agent's).
    """

    def __init__(self, action_low: np.ndarray, action_high: np.ndarray, seed: int = 0) -> None:
        super().__init__()
        self.low = np.asarray(action_low, dtype=np.float32)
        self.high = np.asarray(action_high, dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    @classmethod
    def build(cls, context: GuideContext) -> UniformGuide:
        """Bounds and seed from the run."""
        return cls(context.action_low, context.action_high, context.seed)

    def _propose(self, frames: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        actions = self.rng.uniform(self.low, self.high, size=(len(frames), self.low.size))
        return actions.astype(np.float32), np.ones(len(frames), dtype=bool)
