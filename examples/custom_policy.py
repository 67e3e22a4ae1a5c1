"""A policy of your own: SAC with random cutout, defined outside the package.

Everything COVR needs comes from :class:`~covr_lightning.policies.sac.SACPolicyModule`; this
subclass overrides one seam, :meth:`CutoutSAC.augment`, and adds two recipe keys (its own
``__init__`` arguments). Train it on the quickstart recipe from the repository root (the folder
holding ``examples/`` must be importable, hence ``PYTHONPATH=.``)::

    PYTHONPATH=. covr-lightning fit --recipe quickstart policy.class_path=examples.custom_policy.CutoutSAC
    PYTHONPATH=. covr-lightning fit --recipe quickstart policy.class_path=examples.custom_policy.CutoutSAC policy.max_cut=16

(from a source checkout without installing the package: ``PYTHONPATH=src:. python -m
covr_lightning fit ...``). ``--resume last`` needs the same ``PYTHONPATH``: the checkpoint
records the class as ``examples.custom_policy.CutoutSAC``. ``docs/subclassing.md`` walks through
the seams, what the loop calls and how the VLM prior reaches ``actor_loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from covr_lightning.errors import ConfigError
from covr_lightning.policies.sac import SACPolicyModule


def random_cutout(
    obs: Tensor, min_cut: int, max_cut: int, generator: torch.Generator | None = None
) -> Tensor:
    """Blank a random rectangle of each image (RAD's cutout), the same one on all its channels.

    Each sample draws a height and width in ``[min_cut, max_cut]`` and a position that keeps the
    rectangle inside the image; those pixels become 0.

    Args:
        obs: ``(B, C, H, W)`` frames.
        min_cut: Smallest side of the rectangle in pixels.
        max_cut: Largest side of the rectangle in pixels (at most ``min(H, W)``).
        generator: Optional RNG (defaults to torch's global RNG).

    Returns:
        ``(B, C, H, W)`` in the dtype of ``obs``.
    """
    batch, _, height, width = obs.shape
    device = obs.device

    def draw(low: Tensor | int, high: Tensor | int) -> Tensor:  # uniform integers in [low, high]
        u = torch.rand(batch, device=device, generator=generator)
        return (low + (u * (torch.as_tensor(high) - low + 1)).floor()).long()

    cut_h, cut_w = draw(min_cut, max_cut), draw(min_cut, max_cut)
    top, left = draw(0, height - cut_h), draw(0, width - cut_w)
    rows = torch.arange(height, device=device)[None, :]
    cols = torch.arange(width, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + cut_h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + cut_w)[:, None])  # (B, W)
    inside = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (B, 1, H, W)
    return obs.masked_fill(inside, 0)


class CutoutSAC(SACPolicyModule):
    """Pixel SAC trained on cutout-augmented observations.

    The image size does not change, so :meth:`observation_transform` (what acting sees) stays the
    identity and the networks are built for the env's frames as they are.

    Args:
        obs_shape: ``(C, H, W)`` stacked uint8 frames (passed by the loop).
        action_dim: Number of action dimensions (passed by the loop).
        min_cut: Smallest side of the blanked rectangle in pixels (recipe key ``policy.min_cut``).
        max_cut: Largest side of the blanked rectangle in pixels (``policy.max_cut``).
        **sac_kwargs: Every :class:`SACPolicyModule` hyperparameter (``policy.actor_lr`` ...).

    Raises:
        ConfigError: On state observations or a cut that does not fit the frames.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        action_dim: int,
        *,
        min_cut: int = 4,
        max_cut: int = 12,
        **sac_kwargs,
    ) -> None:
        if len(obs_shape) != 3:
            raise ConfigError(
                f"CutoutSAC augments images, got observations of shape {tuple(obs_shape)}",
                "use env.obs=pixels",
            )
        if not 0 < min_cut <= max_cut <= min(obs_shape[1:]):
            raise ConfigError(
                f"cutout sides must satisfy 0 < min_cut <= max_cut <= {min(obs_shape[1:])}, "
                f"got {min_cut} and {max_cut}",
                "set policy.min_cut and policy.max_cut to fit env.image_size",
            )
        super().__init__(obs_shape, action_dim, **sac_kwargs)
        self.min_cut = min_cut
        self.max_cut = max_cut

    def augment(self, obs: Tensor) -> Tensor:
        """Cutout; obs and next_obs arrive stacked on channels, so a transition shares its cut.

        Args:
            obs: ``(B, 2C, H, W)`` sampled frames.

        Returns:
            ``(B, 2C, H, W)`` with one rectangle per sample set to 0.
        """
        return random_cutout(obs, self.min_cut, self.max_cut)
