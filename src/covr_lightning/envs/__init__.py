"""Environments behind the gymnasium API (env step = one physics control step).

:class:`PixelEnv` (``base.py``) states the protocol the loop relies on and implements the agent
step once; :class:`DMCEnv`, :class:`CarRacingEnv` and :class:`CarlaEnv` (the ``carla`` package)
fill in their simulators. Importing this package loads no simulator: each class is imported on
first use (``from covr_lightning.envs import DMCEnv`` loads dm_control then), and ``carla``,
Box2D and pygame only when such an env is built. So reading a recipe (``fit --dry-run``,
``recipes``) does not pay for simulators it does not run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from covr_lightning.envs.base import PixelEnv
    from covr_lightning.envs.car_racing import CarRacingEnv
    from covr_lightning.envs.carla import CarlaEnv
    from covr_lightning.envs.dmc import DMCEnv
    from covr_lightning.envs.vector import EnvPool

_HOME = {
    "CarRacingEnv": "covr_lightning.envs.car_racing",
    "CarlaEnv": "covr_lightning.envs.carla",
    "DMCEnv": "covr_lightning.envs.dmc",
    "EnvPool": "covr_lightning.envs.vector",
    "PixelEnv": "covr_lightning.envs.base",
}

__all__ = ["CarRacingEnv", "CarlaEnv", "DMCEnv", "EnvPool", "PixelEnv"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
