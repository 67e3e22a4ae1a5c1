"""A trained policy as the prior, optionally with Gaussian noise: a guide of known quality.

With ``noise=0`` it proposes what a policy that already solves the task would do (a good VLM's
best case); with large noise it degrades towards a random guide. Used by
``benchmarks/prior_mechanism.py`` to measure what the prior path and its filter do without a VLM.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jsonargparse.typing import NonNegativeFloat

from covr_lightning.guides.base import Guide, GuideContext


class PolicyGuide(Guide):
    """The deterministic action of a trained policy, plus N(0, noise^2), clipped to the bounds.

    Args:
        checkpoint: A run directory, checkpoint directory or ``state.pt`` of a run whose policy
            acts on this env's observations.
        noise: Standard deviation of the Gaussian noise added per action dimension (actions live
            in [-1, 1]; 0.5 is heavy, 2 is close to random at the bounds).
        policy: The loaded policy (the builder passes it; not a recipe value).
        action_low: ``(A,)`` lower bounds (builder).
        action_high: ``(A,)`` upper bounds (builder).
        seed: Seed of the noise (builder; apart from the agent's streams).
    """

    def __init__(
        self,
        checkpoint: str,
        noise: NonNegativeFloat = 0.0,
        *,
        policy: Any = None,
        action_low: np.ndarray | None = None,
        action_high: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if policy is None or action_low is None or action_high is None:
            raise ValueError("PolicyGuide needs the loaded policy and the action bounds")
        self.checkpoint = checkpoint
        self.noise = float(noise)
        self.policy = policy
        self.low = np.asarray(action_low, dtype=np.float32)
        self.high = np.asarray(action_high, dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    @classmethod
    def build(cls, context: GuideContext, checkpoint: str, noise: float = 0.0) -> PolicyGuide:
        """Load the checkpoint's policy through the run's loader."""
        return cls(
            checkpoint,
            noise,
            policy=context.load_policy(checkpoint),
            action_low=context.action_low,
            action_high=context.action_high,
            seed=context.seed,
        )

    def _propose(self, frames: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if obs.ndim < 2 or obs.shape[1] == 0:
            raise ValueError("PolicyGuide acts on the policy's observations: pass obs to propose")
        actions = np.asarray(self.policy.act(obs, deterministic=True), dtype=np.float32)
        actions = actions.reshape(len(obs), -1)
        if self.noise > 0:
            actions = actions + self.noise * self.rng.standard_normal(actions.shape)
        actions = np.clip(actions, self.low, self.high).astype(np.float32)
        return actions, np.ones(len(obs), dtype=bool)
