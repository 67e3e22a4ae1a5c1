"""Policies: pixel SAC (RAD/CURL) and the bases COVR is applied to, by subclassing at its seams.

:class:`SACPolicyModule` composes the networks and the SAC losses; :class:`RADModule` overrides its
observation seams (augmentation, acting transform); :class:`DeepMDPModule` adds latent transition and
reward losses to its critic loss. ``docs/subclassing.md`` shows how to write another one.
"""

from __future__ import annotations

from covr_lightning.policies.deepmdp import DeepMDPModule
from covr_lightning.policies.networks import (
    Actor,
    PixelEncoder,
    StateEncoder,
    TwinCritic,
    make_encoder,
)
from covr_lightning.policies.rad import RADModule
from covr_lightning.policies.sac import SACPolicyModule, VLMPrior

__all__ = [
    "Actor",
    "DeepMDPModule",
    "PixelEncoder",
    "RADModule",
    "SACPolicyModule",
    "StateEncoder",
    "TwinCritic",
    "VLMPrior",
    "make_encoder",
]
