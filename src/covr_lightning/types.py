"""Bounded number types for the recipe-facing signatures, defined once.

jsonargparse registers each restricted type by its bounds, so two modules defining the same
bounds under different names would clash; every module takes its types from here (or from
``jsonargparse.typing`` for the stock ones such as ``PositiveInt``).
"""

from __future__ import annotations

from jsonargparse.typing import restricted_number_type

OpenClosedUnitInterval = restricted_number_type(
    "OpenClosedUnitInterval", float, [(">", 0.0), ("<=", 1.0)]
)
"""A share in (0, 1]: Polyak rates, CarRacing's lap share."""

UnitFraction = restricted_number_type("UnitFraction", float, [(">=", 0.0), ("<", 1.0)])
"""A share in [0, 1): LoRA dropout, label smoothing."""

VLMImageSize = restricted_number_type("VLMImageSize", int, (">=", 28))
"""Side of the VLM's render: at least 28 px (one 14-px patch pair of Qwen-VL's merger)."""
