"""RAD: SAC with data augmentation of the pixel observations (Laskin et al., 2020).

Only the two observation seams of :class:`~covr_lightning.policies.sac.SACPolicyModule` differ
from SAC:

* :meth:`RADModule.augment` (training): a random shift, crop or translate of each sampled
  transition. ``SACPolicyModule.training_step`` passes obs and next_obs stacked on the channel
  axis, so both observations of a transition get the same offset (one draw per sample, different
  across samples), as RAD's translate does.
* :meth:`RADModule.observation_transform` (acting, evaluation, the critic's return signals): the
  deterministic counterpart, applied to raw env observations. ``crop`` trains on random
  ``crop_size`` windows of a larger render and acts on the centre window; ``translate`` trains on
  the frame at a random place on a ``translate_size`` zero canvas and acts on the centred frame.
  The encoder is built for the post-transform size (``network_obs_shape``).

Paper protocol (RAD's DMC runs): render 100x100, ``crop`` to 84x84. ``translate`` uses 100 -> 108.
``shift`` (DrQ's replicate-pad shift, same size in and out) is the default, for renders that are
already the network's size (the quickstart's 48 px).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from covr_lightning.errors import ConfigError
from covr_lightning.policies.augment import (
    center_crop,
    center_translate,
    random_crop,
    random_shift,
    random_translate,
)
from covr_lightning.policies.sac import SACPolicyModule

AUGMENTATIONS = ("shift", "crop", "translate")


class RADModule(SACPolicyModule):
    """Pixel SAC with RAD-style augmentation.

    Args:
        obs_shape: ``(C, H, W)`` stacked uint8 frames as the env renders them (100x100 for
            ``crop`` and ``translate`` in RAD's protocol).
        action_dim: Number of action dimensions.
        augmentation: ``shift`` (DrQ: replicate-pad by ``shift_pad``, random crop back to the same
            size), ``crop`` (RAD: random ``crop_size`` window; acting uses the centre window) or
            ``translate`` (RAD: frame at a random place on a ``translate_size`` zero canvas;
            acting uses the centred frame).
        shift_pad: Maximum shift in pixels for ``shift`` (DrQ: 4 at 84x84).
        crop_size: Side of the crop for ``crop`` (RAD: 84 from 100).
        translate_size: Side of the canvas for ``translate`` (RAD: 108 for 100).
        **sac_kwargs: Every :class:`SACPolicyModule` hyperparameter.

    Raises:
        ConfigError: On state (non-image) observations, an unknown augmentation, or a size that
            does not fit the rendered frames.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        action_dim: int,
        *,
        augmentation: Literal["shift", "crop", "translate"] = "shift",
        shift_pad: int = 4,
        crop_size: int = 84,
        translate_size: int = 108,
        **sac_kwargs,
    ) -> None:
        _check_augmentation(
            tuple(obs_shape),
            augmentation,
            shift_pad,
            crop_size,
            translate_size,
            type(self).__name__,
        )
        # Set before SACPolicyModule.__init__, which sizes the networks by a dummy forward
        # through observation_transform (plain attributes are allowed before nn.Module.__init__).
        self.augmentation = augmentation
        self.shift_pad = shift_pad
        self.crop_size = crop_size
        self.translate_size = translate_size
        super().__init__(obs_shape, action_dim, **sac_kwargs)

    def augment(self, obs: Tensor) -> Tensor:
        """Random shift / crop / translate, one offset per sample shared by all its channels.

        Args:
            obs: ``(B, C, H, W)`` frames (obs and next_obs stacked on channels by
                ``training_step``).

        Returns:
            ``(B, C, *network_obs_shape[1:])``: float32 for ``shift``, uint8 otherwise.
        """
        if self.augmentation == "crop":
            return random_crop(obs, self.crop_size)
        if self.augmentation == "translate":
            return random_translate(obs, self.translate_size)
        return random_shift(obs, self.shift_pad)

    def observation_transform(self, obs: Tensor) -> Tensor:
        """Centre crop (``crop``), centred canvas (``translate``) or nothing (``shift``).

        Args:
            obs: ``(B, *obs_shape)`` raw env observations.

        Returns:
            ``(B, *network_obs_shape)``.
        """
        if self.augmentation == "crop":
            return center_crop(obs, self.crop_size)
        if self.augmentation == "translate":
            return center_translate(obs, self.translate_size)
        return obs


def _check_augmentation(
    obs_shape: tuple[int, ...],
    augmentation: str,
    shift_pad: int,
    crop_size: int,
    translate_size: int,
    owner: str,
) -> None:
    if len(obs_shape) != 3:
        raise ConfigError(
            f"{owner} augments images, got observations of shape {obs_shape}",
            "use env.obs=pixels, or SACPolicyModule for state vectors",
        )
    if augmentation not in AUGMENTATIONS:
        raise ConfigError(
            f"unknown augmentation '{augmentation}'",
            f"set policy.augmentation to one of {', '.join(AUGMENTATIONS)}",
        )
    side = min(obs_shape[1:])
    if augmentation == "shift" and shift_pad < 0:
        raise ConfigError(f"shift_pad must be >= 0, got {shift_pad}", "use 4 for 84x84 frames")
    if augmentation == "crop" and not 0 < crop_size <= side:
        raise ConfigError(
            f"policy.crop_size {crop_size} does not fit the {obs_shape[1]}x{obs_shape[2]} frames",
            "render larger than the crop (RAD: env.image_size=100, policy.crop_size=84)",
        )
    if augmentation == "translate" and translate_size < max(obs_shape[1:]):
        raise ConfigError(
            f"policy.translate_size {translate_size} is smaller than the "
            f"{obs_shape[1]}x{obs_shape[2]} frames",
            "use a canvas larger than env.image_size (RAD: 108 for 100)",
        )
