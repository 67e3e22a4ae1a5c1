"""RAD: SAC with data augmentation of the pixel observations (Laskin et al., 2020).

Only the :meth:`~covr_lightning.policies.sac.SACPolicyModule.augment` seam differs from SAC: the
sampled ``obs`` and ``next_obs`` are augmented (each draw independent, as RAD and DrQ do) before
the critic and actor losses see them; acting uses the raw frames.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from covr_lightning.errors import ConfigError
from covr_lightning.policies.augment import random_shift
from covr_lightning.policies.sac import SACPolicyModule


class RADModule(SACPolicyModule):
    """Pixel SAC with RAD-style augmentation.

    Args:
        obs_shape: ``(C, H, W)`` stacked uint8 frames.
        action_dim: Number of action dimensions.
        augmentation: ``shift`` (DrQ's replicate-pad + random crop back to the same size).
        shift_pad: Maximum shift in pixels for ``shift`` (DrQ: 4 at 84x84).
        **sac_kwargs: Every :class:`SACPolicyModule` hyperparameter.

    Raises:
        ConfigError: On state (non-image) observations or a negative pad.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        action_dim: int,
        *,
        augmentation: Literal["shift"] = "shift",
        shift_pad: int = 4,
        **sac_kwargs,
    ) -> None:
        if len(obs_shape) != 3:
            raise ConfigError(
                f"{type(self).__name__} augments images, got observations of shape {obs_shape}",
                "use env.obs=pixels, or SACPolicyModule for state vectors",
            )
        if shift_pad < 0:
            raise ConfigError(f"shift_pad must be >= 0, got {shift_pad}", "use 4 for 84x84 frames")
        super().__init__(obs_shape, action_dim, **sac_kwargs)
        self.augmentation = augmentation
        self.shift_pad = shift_pad

    def augment(self, obs: Tensor) -> Tensor:
        """Randomly shift each frame stack (the same shift for all stacked frames of a sample)."""
        return random_shift(obs, self.shift_pad)
