"""SAC policies (RAD/CURL pixel SAC): networks, losses as plain functions, the LightningModule."""

from __future__ import annotations

from covr_lightning.policies.networks import (
    Actor,
    PixelEncoder,
    StateEncoder,
    TwinCritic,
    make_encoder,
)
from covr_lightning.policies.sac import SACPolicyModule, VLMPrior

__all__ = [
    "Actor",
    "PixelEncoder",
    "SACPolicyModule",
    "StateEncoder",
    "TwinCritic",
    "VLMPrior",
    "make_encoder",
]
